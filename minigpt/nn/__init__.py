"""The model: layer pairs (forward, backward), the flat parameter buffer, the GPT itself."""
