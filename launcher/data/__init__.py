"""How a record becomes a training row: read records (records.py), turn each format into text or chat turns
(formats/), render and label chat turns with the tokenizer's template (chat.py), pack several records per row
with restarting position_ids (pack.py), and cache the rows on disk (store.py, build.py).

Nothing here imports torch: the rows are numpy arrays, and the tokenizer is passed in.
`python -m launcher.data <overrides> row=N` prints a packed row with its labels (see __main__.py).
"""
