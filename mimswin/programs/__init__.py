"""The programs: pretrain, finetune, linprobe, knn, export, visualize, shards, bench; one shared scaffold."""
