"""Online serving: `distinfer serve`."""
