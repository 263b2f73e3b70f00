"""From kernel samples to names: flows joined into conversations, the DNS cache, the
CRM catalogue, tenants, and the attributor that combines them."""
