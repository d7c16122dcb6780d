"""scGPT: checkpoint layout and loading, gene matching, value binning, the encoder."""
