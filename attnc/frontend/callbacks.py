"""FlexAttention-style callbacks -> Variant (placeholder until the tracer lands)."""
