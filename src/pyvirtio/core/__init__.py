"""Device and driver core: status, feature negotiation, configuration space (spec ch. 2-3)."""
