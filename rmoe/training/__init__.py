"""Lightning glue: the LightningModule and callbacks."""
