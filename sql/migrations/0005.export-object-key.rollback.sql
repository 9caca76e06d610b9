ALTER TABLE exports DROP COLUMN object_key;
