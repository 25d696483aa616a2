"""Shared HTTP plumbing of every protocol: middleware, body parsing, server limits, dependencies."""
