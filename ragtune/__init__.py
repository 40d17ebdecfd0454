"""ragtune: fine-tune or RAG? Train, retrieve, serve and compare small local models, offline.

    ragtune --help
"""

__version__ = "0.1.0"
