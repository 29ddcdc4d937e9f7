"""The method of arXiv:2511.17801: high-impact weights at moderate width, ratios per layer."""
