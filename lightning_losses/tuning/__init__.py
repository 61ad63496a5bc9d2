"""Ray Tune PBT/PB2 glue and the Self-Tuning Network loop. Import the submodules directly."""
