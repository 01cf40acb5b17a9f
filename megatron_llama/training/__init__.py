"""Training: the recipe (TrainConfig, schedule), engines behind one interface, the loop, logs
and plots. Inside: recipe, metrics, plot < engines < loop < commands."""
