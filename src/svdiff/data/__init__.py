"""Training data: image folders, the transforms that make them model inputs, concept lists and Cut-Mix collages."""
