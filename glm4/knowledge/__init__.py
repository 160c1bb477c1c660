"""The knowledge base: documents parsed into passages (ingest), ranked search (index), files and vector stores
per owner on disk (store), and the prompt/citation helpers (context)."""
