"""Sweeps: Ray Tune over the job's search space, the leaderboard, model soups."""
