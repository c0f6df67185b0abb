"""Evaluating pretrained encoders: the timm classifier of a checkpoint, frozen features, logistic and k-NN probes,
metrics, the evaluation callbacks, reconstruction pictures. The programs that run them live in mimswin/programs."""
