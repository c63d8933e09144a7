"""PyTorch reference implementations and inputs for parity tests (test-only code)."""
