"""Training data: image folders, the transforms that make them model inputs, and (later) collages."""
