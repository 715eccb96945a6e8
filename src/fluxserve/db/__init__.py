"""The neutral database layer: tables, migrations, connection, the credit ledger and the webhook outbox.

Functions here take a connection, so the job store can hold credits and queue a webhook in the same
transaction that writes the job; nothing here imports the packages that use it.
"""
