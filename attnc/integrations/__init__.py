"""attnc inside other libraries: each module registers attnc where that library looks for attention.

transformers: `from attnc.integrations import transformers; transformers.register()` (needs `pip install
transformers`, an optional extra)."""
