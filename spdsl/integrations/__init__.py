"""Adapters to other libraries: FlexAttention (:mod:`.flex`); more to come (transformers)."""
