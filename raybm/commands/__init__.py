"""The ``raybm`` commands, by what they do: run stages, use a model, read results."""
