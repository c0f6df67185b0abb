"""The throughput benchmark's machinery (`mimswin bench`): the contenders (rows, setups, builders), how a model row
and a loader row are measured, one run over the rows asked, its report and table."""
