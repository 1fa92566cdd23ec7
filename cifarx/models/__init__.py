"""Model families, each builder registered by name (`registry.py`); `create_model` imports them when first asked."""
