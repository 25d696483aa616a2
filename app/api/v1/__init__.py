"""The /v1 API: detect, render, models, jobs, and its request and response models."""
