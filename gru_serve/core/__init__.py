"""The transport-free core: sessions, generation requests, sequences, snapshots, the model repository."""
