-- Vendor authority schema, version 4: short certificates for servers that sync online.
-- A sync by file certifies for 366 days (the reference's rule); an online sync for the
-- customer's `online_certificate_days` (NULL: 30). Each server row keeps the end of the
-- certificate it was last given.
ALTER TABLE customers ADD COLUMN online_certificate_days INTEGER;
ALTER TABLE servers ADD COLUMN certificate_valid_until_ms INTEGER;
