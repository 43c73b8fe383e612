"""The controller: block maps and epochs, stage membership, admission."""
