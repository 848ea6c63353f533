"""The experiments: the benchmark (`make benchmark`), the loss x optimizer grid study, the temperature study, the
data-scaling study and the gap at initialisation, with the trainer processes and scoring they share."""
