"""Device models and the contract they share with the migration engine."""
