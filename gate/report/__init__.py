"""Report schema and formatters. Formatters return strings; only the CLI writes files."""
