"""One module per schema revision, named NNNN_slug.py with revision id NNNN."""
