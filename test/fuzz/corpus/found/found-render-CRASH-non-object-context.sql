-- nocrm_automation fuzz finding: CRASH (SIGSEGV), found by this harness on 77f3f27, fixed in e058053
-- phase render; seed file corpus/seeds/render-array-alias.json (also produced by the render phase's alias_array())
-- nocrm_render() (src/templates.c) looked placeholders up with getKeyJsonValueFromContainer() on the
-- context's root container without checking it is an object.  For an array the "keys" are read at
-- wrong offsets; when one matches, the value JEntry is taken from element data (here bytes
-- " \x01 " = a string of ~18 MB) and copied: out-of-bounds read, segfault.  The second statement
-- (bytes "abc0" = JENTRY_ISBOOL_TRUE) rendered "[true]" without crashing on the old build.
-- Since e058053 a non-object context renders every placeholder empty: both must give "[]".
-- run: psql -X -v ON_ERROR_STOP=0 -f THIS_FILE  (a database with test/fixtures/crm.sql loaded)
BEGIN;
SELECT nocrm.render('[{{lead.title}}]', '["mynbiqpm  ", " \u0001sgqejeyd", "tzirwztejd", "xcvkprdlnk", "lead.title"]'::jsonb); SELECT nocrm.render('[{{lead.title}}]', '["mynbiqpmab", "c0sgqejeyd", "tzirwztejd", "xcvkprdlnk", "lead.title"]'::jsonb);
ROLLBACK;
