-- The email message as built for SMTP (nocrm.email_message), the mail settings'
-- checks, and addresses refused when a rule is saved.
\i test/fixtures/crm.sql
SET nocrm.mail_from = 'butler@crm.example';
SET nocrm.mail_from_name = 'Acme CRM';

-- Physical lines of a message (without CRLF), the Date line masked.
CREATE FUNCTION pg_temp.lines(msg text) RETURNS TABLE (n bigint, line text, len int)
LANGUAGE sql AS $$
  SELECT n, regexp_replace(l, '^Date: .*', 'Date: <now>'), length(l)
    FROM regexp_split_to_table(msg, E'\r\n') WITH ORDINALITY AS t(l, n)
$$;
-- The header as one string (unfolded), and checks every message must pass.
CREATE FUNCTION pg_temp.header(msg text, name text) RETURNS text
LANGUAGE sql AS $$
  SELECT substring(regexp_replace(split_part(msg, E'\r\n\r\n', 1), E'\r\n[ \t]', ' ', 'g')
                   FROM '(?:^|\r\n)' || name || ': ([^\r\n]*)')
$$;
CREATE FUNCTION pg_temp.decoded(value text) RETURNS text
LANGUAGE sql AS $$
  SELECT string_agg(convert_from(decode(m[1], 'base64'), 'UTF8'), '' ORDER BY n)
    FROM regexp_matches(value, '=\?UTF-8\?B\?([^?]*)\?=', 'g') WITH ORDINALITY AS t(m, n)
$$;
CREATE FUNCTION pg_temp.checks(msg text) RETURNS TABLE (bare_lf boolean, longest_header_line int,
                                                       longest_body_line int, ends_crlf boolean)
LANGUAGE sql AS $$
  SELECT position(E'\n' IN replace(msg, E'\r\n', '')) > 0 OR position(E'\r' IN replace(msg, E'\r\n', '')) > 0,
         (SELECT max(length(l)) FROM regexp_split_to_table(split_part(msg, E'\r\n\r\n', 1), E'\r\n') l),
         (SELECT max(length(l)) FROM regexp_split_to_table(split_part(msg, E'\r\n\r\n', 2), E'\r\n') l),
         right(msg, 2) = E'\r\n'
$$;

-- A plain message: every header line, the body in base64.
SELECT * FROM pg_temp.lines(nocrm.email_message('anna@client.example', 'Your quote',
  E'Hello,\nhere it is.\n', '11111111-2222-4333-8444-555555555555'));
-- The body is sent with CRLF line ends whatever it had (RFC 2045).
SELECT convert_from(decode(replace(split_part(nocrm.email_message('a@client.example', 's',
         E'one\ntwo\r\nthree\rfour', 'k'), E'\r\n\r\n', 2), E'\r\n', ''), 'base64'), 'UTF8')
       = E'one\r\ntwo\r\nthree\r\nfour' AS crlf_body;

-- A long non-ASCII subject: encoded words on lines of at most 76, each line whole characters.
SELECT * FROM pg_temp.lines(nocrm.email_message('anna@client.example',
  'Caffè Ü ' || repeat('€', 30) || ' fine', 'x', 'k')) WHERE n BETWEEN 4 AND 7;
SELECT pg_temp.decoded(pg_temp.header(m, 'Subject')) = 'Caffè Ü ' || repeat('€', 30) || ' fine' AS round_trip,
       c.*
  FROM (SELECT nocrm.email_message('anna@client.example', 'Caffè Ü ' || repeat('€', 30) || ' fine', 'x', 'k') m) s,
       pg_temp.checks(m) c;

-- A title that looks like an encoded word is encoded itself, not passed through.
SELECT pg_temp.header(m, 'Subject') AS raw, pg_temp.decoded(pg_temp.header(m, 'Subject')) AS shown
  FROM (SELECT nocrm.email_message('a@client.example', '=?UTF-8?B?SGFja2Vk?=', 'x', 'k') m) s;

-- A long ASCII subject is folded before spaces within 78 columns, and unfolds to itself.
SELECT * FROM pg_temp.lines(nocrm.email_message('a@client.example',
  rtrim(repeat('Preventivo numero 12 ', 10)), 'x', 'k')) WHERE n BETWEEN 4 AND 7;
SELECT pg_temp.header(m, 'Subject') = rtrim(repeat('Preventivo numero 12 ', 10)) AS unfolds, c.*
  FROM (SELECT nocrm.email_message('a@client.example', rtrim(repeat('Preventivo numero 12 ', 10)), 'x', 'k') m) s,
       pg_temp.checks(m) c;
-- CR, LF and TAB in a subject become spaces: no header can be added.
SELECT pg_temp.header(nocrm.email_message('a@client.example', E'Hi\r\nBcc: evil@x\tthere', 'x', 'k'), 'Subject');

-- Display names: quoted with escapes when ASCII, encoded words otherwise.
SET nocrm.mail_from_name = 'The "Butler", CRM \ Acme';
SELECT pg_temp.header(nocrm.email_message('a@client.example', 's', 'x', 'k'), 'From');
SET nocrm.mail_from_name = 'Zoë from the CRM';
SELECT pg_temp.header(m, 'From') AS raw, pg_temp.decoded(pg_temp.header(m, 'From')) AS name
  FROM (SELECT nocrm.email_message('a@client.example', 's', 'x', 'k') m) s;
RESET nocrm.mail_from_name;
SELECT pg_temp.header(nocrm.email_message('a@client.example', 's', 'x', 'k'), 'From');

-- Internationalized addresses: domains IDNA-encoded, a UTF-8 local part as UTF-8 (RFC 6532).
SELECT a AS address, pg_temp.header(nocrm.email_message(a, 's', 'x', 'k'), 'To') AS "To"
  FROM unnest(ARRAY['anna@caffè.example', 'info@bücher-ünd-straße.example', 'zoë@example.com',
                    'ZOË@Straße.Example', 'plain@example.com']) a;
SET nocrm.mail_from = 'crm@bücher.example';
SELECT pg_temp.header(m, 'From') AS "From", pg_temp.header(m, 'Message-ID') AS "Message-ID"
  FROM (SELECT nocrm.email_message('a@client.example', 's', 'x', 'k') m) s;
RESET nocrm.mail_from;

-- What cannot be sent.
SELECT nocrm.email_message('x@' || repeat('è', 60) || '.example', 's', 'x', 'k');
SELECT nocrm.email_message('two words@client.example', 's', 'x', 'k');
SELECT nocrm.email_message('x@a..example', 's', 'x', 'k');
SELECT nocrm.email_message('x@' || repeat('a', 64) || '.example', 's', 'x', 'k');
SET nocrm.mail_from = 'not an address';
SELECT nocrm.email_message('a@client.example', 's', 'x', 'k');
RESET nocrm.mail_from;

-- A constant "to" is checked when the automation is saved.
SELECT nocrm.create_automation(name => 'bad to', event => 'lead.creation',
  actions => jsonb_build_array(jsonb_build_object('type', 'send_email', 'template', 'quote_followup',
                                                  'to', 'x@' || repeat('è', 60) || '.example')));
SELECT nocrm.create_automation(name => 'idn to', event => 'lead.creation',
  actions => '[{"type": "send_email", "template": "quote_followup", "to": "anna@caffè.example"}]') > 0 AS saved;

-- Settings' checks.
\set VERBOSITY terse
SET nocrm.smtp_helo_name = 'bad name';
SET nocrm.smtp_helo_name = '-x.example';
SET nocrm.smtp_helo_name = 'a..example';
SET nocrm.smtp_helo_name = 'caffè.example';
SET nocrm.smtp_helo_name = '[1.2.3.4x]';
SET nocrm.smtp_tls_server_name = 'mx example';
SET nocrm.mail_from_name = E'Two\nlines';
SET nocrm.smtp_tls_verify = 'maybe';
SET nocrm.smtp_tls_pinned_key = 'md5//abc';
\set VERBOSITY default
SET nocrm.smtp_helo_name = 'db1.crm.example';
SET nocrm.smtp_helo_name = '[192.0.2.1]';
SET nocrm.smtp_helo_name = '[IPv6:2001:db8::1]';
SET nocrm.smtp_tls_server_name = 'mx.crm.example';
SET nocrm.smtp_tls_verify = off;
SET nocrm.smtp_tls_pinned_key = 'sha256//YhKJKSzoTt2b5FP18fvpHo7fJYqQCjAa3HWY3tvRMwE=;sha256//t62CeU2tQiqkexU74Gxa2eg7fRbEgoChTociMee9wno=';
SHOW nocrm.smtp_tls_pinned_key;
SHOW nocrm.smtp_helo_name;
SHOW nocrm.smtp_tls_server_name;
SHOW nocrm.smtp_tls_verify;
