"""The core: protocol, registry, layers, injection, model, save/load. Written once for every method."""
