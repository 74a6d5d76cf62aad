"""Pictures of a run: the most and least novel samples, matplotlib figures, and the one-page report."""
