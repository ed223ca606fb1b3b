"""What the webhook and the worker share: settings, the Redis layout, payload models and
the conversation store. Nothing here imports torch or transformers."""
