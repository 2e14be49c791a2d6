"""The recorder's statistics wing: the per-call fields declared once, the implementations
that fill them (C kernels, torch ops, compiled graphs) and the statistics derived from them."""
