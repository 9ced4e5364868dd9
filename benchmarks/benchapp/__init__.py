"""The one model both packages' benchmarks run over, and the source and handlers they use."""
