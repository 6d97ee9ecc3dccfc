"""Experiments: à-la-carte vs paragon vs FedAvg, class-incremental, forgetting, cost."""
