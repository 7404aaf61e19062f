"""Your own model, loss and data with raytrain-ft: runnable examples (each also runs in the test
suite)."""
