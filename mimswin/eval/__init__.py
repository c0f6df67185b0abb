"""Evaluation of pretrained encoders on labeled data: fine-tuning, linear probing (MAE recipe or cached), k-NN."""
