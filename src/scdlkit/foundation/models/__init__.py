"""Foundation models behind one contract: one folder per model, one registry line each."""
