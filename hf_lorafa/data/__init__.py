"""What training reads: the offline models and datasets, base-model loading, dataset preparation."""
