"""The orchestrator: the speculative loop over Drafter/Verifier protocols, prompts, the engine."""
