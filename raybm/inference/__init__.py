"""Using a trained model: loading it for prediction, scoring it on a labelled split, labelling files."""
