"""The fault matrix: real agents, real data, injected faults; see RELIABILITY.md."""
