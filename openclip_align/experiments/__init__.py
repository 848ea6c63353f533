"""`make benchmark`: the plugin's models and losses side by side against upstream OpenCLIP."""
