-- Polite webhooks: the settings are checked when set, and nocrm.webhook_hosts
-- is readable by admins only.
LOAD 'nocrm_automation';
SET nocrm.webhook_rate = '20/s';
SHOW nocrm.webhook_rate;
SET nocrm.webhook_rate = '600/min';
SET nocrm.webhook_rate = '100/10s';
SET nocrm.webhook_rate = '5 / minute';
SET nocrm.webhook_rate = '1000/hour';
SET nocrm.webhook_rate = 'off';
SET nocrm.webhook_rate = '';
-- refused, with what to write instead; the value before stays
SET nocrm.webhook_rate = '20/s';
SET nocrm.webhook_rate = 'fast';
SET nocrm.webhook_rate = '20';
SET nocrm.webhook_rate = '0/s';
SET nocrm.webhook_rate = '20/fortnight';
SET nocrm.webhook_rate = '-5/s';
SET nocrm.webhook_rate = '20/0s';
SHOW nocrm.webhook_rate;
SET nocrm.webhook_host_concurrency = 4;
SHOW nocrm.webhook_host_concurrency;
SET nocrm.webhook_host_concurrency = 0;
SET nocrm.webhook_host_concurrency = 101;
SET nocrm.webhook_max_retry_after = '10min';
SHOW nocrm.webhook_max_retry_after;
SET nocrm.webhook_max_retry_after = 0;
SHOW nocrm.webhook_max_retry_after;
RESET ALL;
SHOW nocrm.webhook_rate;
SHOW nocrm.webhook_host_concurrency;
SHOW nocrm.webhook_max_retry_after;

-- the table of per-host state: empty until a host asks for a pause or a rate is used
\d nocrm.webhook_hosts
SELECT count(*) FROM nocrm.webhook_hosts;
SELECT grantee, privilege_type FROM information_schema.role_table_grants
 WHERE table_schema = 'nocrm' AND table_name = 'webhook_hosts' AND grantee <> current_user
 ORDER BY 1, 2;
-- nocrm_admin may set the new settings
SELECT parname, paracl FROM pg_parameter_acl WHERE parname LIKE 'nocrm.webhook_%' ORDER BY 1;
