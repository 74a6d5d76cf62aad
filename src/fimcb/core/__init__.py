"""The contracts every layer of fimcb shares, at the bottom of the import graph: the model protocol,
the ``LayerNorms`` value type, the metric contract, option validators, mode and distributed helpers.
Nothing here imports another fimcb package."""
