"""Operations: settings, metrics, logs, the error table, bearer tokens."""
